"""The paper harness: one module per table or figure family of the SPvR paper.

Depends on the method (spvr_lib) and never the reverse.  Each notebook under notebooks/ calls one
of these modules; every number quoted from the paper lives in :mod:`spvr_lib.paper.reference`.
"""
