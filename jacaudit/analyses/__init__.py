"""Analyses: each measures and returns an :class:`jacaudit.analyses.base.AnalysisOutput` (result + metrics +
warnings + artifacts); the gate judges, the CLI writes. See :mod:`jacaudit.analyses.base` for the contract.

Modules: :mod:`.saliency` (grad, gradxinput, smoothgrad, ig), :mod:`.attribution` (the methods themselves),
:mod:`.sanity` (parameter randomisation), :mod:`.maps` (2-D map statistics and PNGs; numpy only),
:mod:`.jacobian`, :mod:`.verify`, :mod:`.inspect`.
"""
