"""Weight rounding methods behind one interface: `round_weight(w, bits, group_size) -> (codes, scales)`."""
