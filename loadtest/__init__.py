"""Load generators and benchmarks for workmem."""
