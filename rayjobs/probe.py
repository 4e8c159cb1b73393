"""Ray job: only the probe step of a pipeline YAML (the SimCLR encoder beside random-init encoders).

Inputs and outputs are wired under the file's run URI as in the whole pipeline; a complete output is skipped.

    ray job submit --working-dir . -- python rayjobs/probe.py --config rayjobs/configs/demo.yaml
"""

import sys

from rxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--steps", "probe", *sys.argv[1:]]))
