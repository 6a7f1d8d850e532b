"""DC-Solver tuning: compensation-ratio calibration and cascade polynomial regression, API and command."""
