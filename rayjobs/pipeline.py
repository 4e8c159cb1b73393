"""Ray job: the whole pipeline (or the steps given with --steps) from one pipeline YAML.

    ray job submit --working-dir . -- python rayjobs/pipeline.py --config rayjobs/configs/demo.yaml
"""

import sys

from rxray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
