"""Fitting: PCA-whitening maths and the fit stage's decisions (what to fit, whether to refit on drift)."""
