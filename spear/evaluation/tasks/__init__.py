"""Local lm-eval task configs (``spear_*``) and their data hooks (``utils.py``)."""
