"""Ray job: only the report step of a pipeline YAML (the HTML report of every step output under the run).

Inputs and outputs are wired under the file's run URI as in the whole pipeline; a complete output is skipped.

    ray job submit --working-dir . -- python rayjobs/report.py --config rayjobs/configs/demo.yaml
"""

import sys

from rxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--steps", "report", *sys.argv[1:]]))
