import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(DEPLOY))              # render, gotemplate
sys.path.insert(0, str(DEPLOY.parent / "common"))
