"""benchmarking"""
