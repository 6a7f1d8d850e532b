"""Built-in offline models and data sets (the "zoo")."""
