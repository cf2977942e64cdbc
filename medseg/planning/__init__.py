"""Planning: fingerprint → plans (the planner, its step-time measurements and memory model checks).

Above networks and training: the planner costs the networks it would build and times a real training step."""
