//! `comatching-appliance`: the replica of matching features and the matcher. (Being built.)
