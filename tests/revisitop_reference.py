"""Independent reference: revisitop's evaluate.py (compute_ap, compute_map) transcribed loop for loop."""

import numpy as np


def revisitop_compute_ap(ranks, nres):
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1.0 / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.0
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def revisitop_compute_map(ranks, gnd, kappas):
    """Literal transcription of revisitop's compute_map (ranks as (n_db, n_q))."""
    nq = len(gnd)
    mAP, nempty = 0.0, 0
    pr = np.zeros(len(kappas))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = revisitop_compute_ap(pos, len(qgnd))
        mAP += ap
        pos += 1
        prs = np.zeros(len(kappas))
        for j in np.arange(len(kappas)):
            if len(pos) == 0:  # not in revisitop (it fails on rankings that miss every positive)
                continue
            kq = min(max(pos), kappas[j])
            prs[j] = (pos <= kq).sum() / kq
        pr += prs
    return mAP / (nq - nempty), pr / (nq - nempty)
