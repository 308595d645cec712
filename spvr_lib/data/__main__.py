"""``python -m spvr_lib.data ensure fashion-mnist``: the data command line (see :func:`spvr_lib.data.main`)."""
from spvr_lib.data import main

if __name__ == "__main__":
    raise SystemExit(main())
