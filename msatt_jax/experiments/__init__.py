"""Experiments that answer the paper's questions with the project's own commands.

`table1`: the paper's Table I (MSConvLSTM-Att against U-Net, Attention U-Net and FCN) and the
ablations of MSConvLSTM-Att, trained, evaluated and compared with paired statistics in one
resumable command. `stats`, `report` and `figures` are its parts.
"""
