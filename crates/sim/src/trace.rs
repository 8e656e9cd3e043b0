//! The run's trace digest: every event the simulator processes is folded into a 64-bit FNV-1a
//! hash, so two runs of one seed can be compared bit for bit by a single line of output.

#[derive(Clone, Debug)]
pub struct TraceDigest {
    state: u64,
    events: u64,
}

impl Default for TraceDigest {
    fn default() -> Self {
        Self {
            state: 0xcbf2_9ce4_8422_2325,
            events: 0,
        }
    }
}

impl TraceDigest {
    pub fn record(&mut self, words: &[u64]) {
        for word in words {
            for byte in word.to_le_bytes() {
                self.state ^= byte as u64;
                self.state = self.state.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        self.events += 1;
    }

    pub fn record_str(&mut self, text: &str) {
        for byte in text.bytes() {
            self.state ^= byte as u64;
            self.state = self.state.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.events += 1;
    }

    pub fn value(&self) -> u64 {
        self.state
    }

    pub fn events(&self) -> u64 {
        self.events
    }
}
