"""rxray's test support, installed by `make setup` from a source checkout and never shipped with rxray.

- :mod:`rxray_testing.cluster`: a multi-node Ray cluster on one machine and a node killer (the node-loss
  tests, `rxray bench chaos`);
- :mod:`rxray_testing.faults`: faults injected into rxray's training workers from outside its code.
"""
