"""Run the whole FIRST stack on one machine: for `first dev`, the tests and the benchmarks."""
