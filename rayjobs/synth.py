"""Ray job: only the synth step of a pipeline YAML (write the synthetic dataset at the pipeline's source (when it holds none)).

Inputs and outputs are wired under the file's run URI as in the whole pipeline; a complete output is skipped.

    ray job submit --working-dir . -- python rayjobs/synth.py --config rayjobs/configs/demo.yaml
"""

import sys

from rxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--steps", "synth", *sys.argv[1:]]))
