"""Classical descriptors: visual-word codebooks and the BoW / VLAD encodings of the local-feature store."""
