"""Ray job: only the explain step of a pipeline YAML (Grad-CAM maps and per-stain attributions).

Inputs and outputs are wired under the file's run URI as in the whole pipeline; a complete output is skipped.

    ray job submit --working-dir . -- python rayjobs/explain.py --config rayjobs/configs/demo.yaml
"""

import sys

from rxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--steps", "explain", *sys.argv[1:]]))
