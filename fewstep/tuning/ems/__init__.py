"""DPM-Solver-v3 tuning: computing empirical model statistics, API and command."""
