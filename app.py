"""The web app, runnable from a checkout: ``python app.py [--tiny] [--port 7860] ...`` (same as ``t2mv app ...``).

The UI lives in `t2mv.app`; this file only re-exports its entry points. Importing it starts nothing.
"""

import sys

from t2mv.app import build_demo, main

__all__ = ["build_demo", "main"]

if __name__ == "__main__":
    sys.exit(main())
