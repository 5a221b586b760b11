"""Stage logic: request schema, samplers, the three stages and the in-process Pipeline. Never imports Ray."""
