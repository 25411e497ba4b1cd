import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DEPLOY = TESTS.parent
# render (deploy/render.py), helm_chart (this folder); the stage registry (common) and placement (launcher)
# without the venv's .pth
sys.path[:0] = [str(DEPLOY), str(TESTS), str(DEPLOY.parent / "common"), str(DEPLOY.parent / "launcher")]
