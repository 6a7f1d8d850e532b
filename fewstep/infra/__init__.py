"""The ground floor every long job shares: atomic files, locks, run identity, shards, process group, argument checks."""
