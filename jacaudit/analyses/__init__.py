"""Analyses: each takes a loaded model and data, and returns a frozen result (see :mod:`jacaudit.results`).

Modules: :mod:`.saliency` (grad, gradxinput, smoothgrad, ig), :mod:`.sanity` (parameter randomisation),
:mod:`.maps` (2-D map statistics and PNGs; numpy only).
"""
