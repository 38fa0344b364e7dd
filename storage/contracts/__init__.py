"""The bottom layer: the config schema, the error types and the run-directory layout.

Every other package may import these modules; they import nothing else of embedpipe.
"""
