"""Side-by-side benchmarks (embedpipe bench <what>): one module per bench, each drives whole flows and
workers and writes JSON.
"""
