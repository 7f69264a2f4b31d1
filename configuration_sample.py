"""Site settings for tfcbir. Copy this file to configuration.py and edit it.

configuration.py is yours (git ignores it). The environment variable TFCBIR_DATA_DIR, when set,
overrides data_dir.
"""

import os

# Where data sets live (<data_dir>/datasets/...) and where runs are written
# (<data_dir>/trainings/<name>/). Relative paths are taken from this file's folder.
data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
