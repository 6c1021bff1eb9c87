"""The lavin chat Space: `python app.py [--model MODEL] [--port PORT]`.

MODEL is a Hub repo id or a local checkpoint folder (also: the MMADAPTERS_MODEL environment variable). Without
one, the Space serves the model named in mmadapters_space.json (written by `mmadapters push-space`), else the
quickstart checkpoint when present, else untrained adapters around the embedded backbones.
"""

import os
import sys

from mmadapters.demo import launch

if __name__ == "__main__":
    launch(sys.argv[1:], kind="lavin", app_dir=os.path.dirname(os.path.abspath(__file__)))
