"""Everything that touches the operating system: commands, devices, the kernel test VM."""
