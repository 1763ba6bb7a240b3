"""Post-hoc layer analysis: spectra (pure math), metric registry, layer scoring, posterior impact."""
