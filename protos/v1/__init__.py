"""Generated code of the raresignal.v1 wire contract (do not edit)."""
