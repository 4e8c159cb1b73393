"""Ray job: only the pretrain step of a pipeline YAML (SimCLR pretraining with Ray Train).

Inputs and outputs are wired under the file's run URI as in the whole pipeline; a complete output is skipped.

    ray job submit --working-dir . -- python rayjobs/pretrain.py --config rayjobs/configs/demo.yaml
"""

import sys

from rxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--steps", "pretrain", *sys.argv[1:]]))
