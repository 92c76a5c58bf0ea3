"""The recurrent form: scans over tokens with the state kept on chip (kernels.py), their launch
table and autograd (launch.py), and the emitter that builds them from the analysis (emit.py)."""
