import os
import sys

# tests import their helpers (reference codec, workload builders) by name
sys.path.insert(0, os.path.dirname(__file__))
