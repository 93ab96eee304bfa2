"""Weight rounding methods behind one interface: `round_weight(w, bits, group_size, ...) -> (int8 codes,
float16 scales)`; GPTQ also takes the Hessian of the calibration inputs."""
