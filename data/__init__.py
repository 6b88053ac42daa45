"""Data for the ConvLSTM/ConvGRU experiments.

`data.mm` generates Moving MNIST (Srivastava et al. 2015) on the fly, downloads MNIST and
reads or makes the fixed test set; it also runs as a script: `python -m data.mm --help`.
`data.arrays` loads your own sequence arrays (--train-data, --test-set).
"""
