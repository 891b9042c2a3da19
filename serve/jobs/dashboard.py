"""The dashboard at `/`: one plain HTML page (dashboard.html beside this file; no build step) over the job API.

The job list refreshes every second; a job's page (`/#job=ID`) follows its event stream (read with fetch, so
the API key travels in the Authorization header, never in a URL), shows its settings, progress, perplexity
and error, draws the per-layer plots of its report as SVG, and cancels it. The key is typed once and kept in
the browser's localStorage (or given as `/#key=KEY`).
"""

from importlib.resources import files


def dashboard_page() -> str:
    return files("llmprune_serve.jobs").joinpath("dashboard.html").read_text()
