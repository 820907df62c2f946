"""The course opens in a real JupyterLab: the server starts offline, serves the notebooks, and
has the ipywidgets front-end extension, so the explorers render as widgets and not as text."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JUPYTER = Path(sys.executable).with_name("jupyter")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def test_widgets_extension_is_installed():
    out = subprocess.run([str(JUPYTER), "labextension", "list"], check=False, capture_output=True, text=True, timeout=120)
    listing = out.stdout + out.stderr
    assert "@jupyter-widgets/jupyterlab-manager" in listing, listing
    line = next(ln for ln in listing.splitlines() if "@jupyter-widgets/jupyterlab-manager" in ln)
    assert "enabled" in line and "OK" in line, line


@pytest.mark.xdist_group("notebooks")
def test_jupyterlab_serves_the_course(tmp_path):
    port = _free_port()
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    root_flag = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    server = subprocess.Popen(
        [str(JUPYTER), "lab", *root_flag, "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--IdentityProvider.token=",
         "--ServerApp.disable_check_xsrf=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", f"--ServerApp.root_dir={ROOT}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = _get(f"{base}/api/status")
                if status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "JupyterLab did not start within 60 s"
            time.sleep(0.5)
        status, page = _get(f"{base}/lab")
        assert status == 200 and b"JupyterLab" in page
        status, body = _get(f"{base}/api/contents/notebooks")
        names = {item["name"] for item in json.loads(body)["content"]}
        assert {"00_setup.ipynb", "01_anchors.ipynb"} <= names
        status, body = _get(f"{base}/api/contents/notebooks/01_anchors.ipynb")
        nb = json.loads(body)["content"]
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        status, body = _get(f"{base}/api/kernelspecs")
        specs = json.loads(body)["kernelspecs"]
        assert "python3" in specs
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
