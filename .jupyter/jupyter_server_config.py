"""Project-local Jupyter server settings; `make lab` adds this folder to JUPYTER_CONFIG_PATH."""

from pathlib import Path

c = get_config()  # noqa: F821  (provided by the Jupyter config loader)

# Workshop machines are often offline, and the "get notified about Jupyter news" pop-up covers
# figures: no news feed, no update check.
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
# The Lab's default settings (overrides.json: news off) come with the project. A learner's own
# changes still go to their user settings and win over these.
c.LabServerApp.app_settings_dir = str(Path(__file__).resolve().parent / "lab" / "settings")
# Build leftovers stay out of the file browser.
c.ContentsManager.hide_globs = [
    "__pycache__", "*.pyc", "*.pyo", ".DS_Store", "*~", ".ipynb_checkpoints", "_build", "*.egg-info",
]
