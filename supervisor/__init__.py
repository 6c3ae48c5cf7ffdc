"""The qvl supervisor: routes requests to worker processes and replaces them when they degrade.

Owns no GPU state and never imports torch: it reads devices through NVML and processes through
psutil, so it can outlive any number of workers.
"""
