"""Side-by-side benchmarks (embedpipe bench <what>): one module per bench, each drives whole flows and
workers and writes JSON. A bench module ``<what>`` has ``add_arguments(parser)`` (its own flags only) and
``run(args) -> int``; its top level stays cheap to import, since ``embedpipe --help`` builds every bench's
sub-command.
"""

# name -> one-line help, in the order ``embedpipe bench --help`` lists them
BENCHES = {
    "extract": "the extraction stage on Ray vs a plain torch loop on the same images",
    "runtimes": "the extraction trunk on torch, ONNX Runtime and OpenVINO at fp32/bf16/int8: ms, cosine, mAP",
    "decode": "DCT-domain JPEG downscale vs full decode + resize, with the descriptor cosine between them",
    "codebook": "faiss k-means vs scikit-learn's Lloyd k-means from the same start, on one Dask sample",
    "pca": "the PCA fit: Dask out-of-core vs in-memory numpy vs scikit-learn, time and peak RSS each",
    "index": "filling a trained index: Ray tasks vs one process; --baseline autofaiss: the index choice",
    "reindex": "reindex of the files that arrived later vs a full run on the whole collection",
    "train": "fine-tuning steps: Ray Train workers vs a plain single-process PyTorch loop",
    "ingest": "the ingest stage vs img2dataset on the same photos served over HTTP from 127.0.0.1",
    "gpu": "one GPU: nvJPEG decode and the model apart and together, images/s and what limits them",
    "scale": "plan, fit, index + evaluate and report at two collection sizes: driver/worker memory, time/row",
}
