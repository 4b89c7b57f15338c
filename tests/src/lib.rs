//! Test harness: brokers, vhosts, processes. (Being built.)
