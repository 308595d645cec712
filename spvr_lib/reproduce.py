"""``python -m spvr_lib.reproduce``: the command-line launcher of :mod:`spvr_lib.paper.reproduce` (the paper harness).

The only module outside spvr_lib/paper that reaches into it, and only when run as a command: importing
``spvr_lib`` or any method module never loads the harness (tests/test_layers.py checks both).
"""
import runpy

if __name__ == "__main__":
    runpy.run_module("spvr_lib.paper.reproduce", run_name="__main__", alter_sys=True)
