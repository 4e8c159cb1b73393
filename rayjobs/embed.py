"""Ray job: only the embed step of a pipeline YAML (embeddings for every site with an actor pool).

Inputs and outputs are wired under the file's run URI as in the whole pipeline; a complete output is skipped.

    ray job submit --working-dir . -- python rayjobs/embed.py --config rayjobs/configs/demo.yaml
"""

import sys

from rxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", "--steps", "embed", *sys.argv[1:]]))
