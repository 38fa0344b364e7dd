"""FAISS indices: factory strings, training and per-part filling, versions, and the index chooser."""
