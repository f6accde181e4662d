//! Quotas on the interfaces a client offers.
//!
//! An offering client may cap, per interface, how many channels it takes at
//! once and how many messages per second it takes over all of them. A peer
//! over the channel cap is refused with a reason that says so; a channel
//! whose peer goes over the message rate is closed with a reason that says
//! so, and its stream stopped with `StreamCode::OverQuota`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::sync::lock;

/// Limits on one offered interface. `None`: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    /// Most channels on the interface at once.
    pub max_channels: Option<usize>,
    /// Most one-way messages and requests per second over all of the
    /// interface's channels (messages on data streams are not counted);
    /// bursts of up to one second's worth pass.
    pub messages_per_second: Option<u32>,
}

/// The live state of one interface's quota.
#[derive(Debug)]
pub(crate) struct Gate {
    interface: String,
    quota: Quota,
    channels: AtomicUsize,
    /// Token bucket: tokens left and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

impl Gate {
    pub(crate) fn new(interface: &str, quota: Quota) -> Arc<Self> {
        let full = f64::from(quota.messages_per_second.unwrap_or(0));
        Arc::new(Self {
            interface: interface.to_owned(),
            quota,
            channels: AtomicUsize::new(0),
            bucket: Mutex::new((full, Instant::now())),
        })
    }

    /// Take a channel slot, or say why not.
    pub(crate) fn take_channel(self: &Arc<Self>) -> Result<ChannelSlot, String> {
        let max = self.quota.max_channels.unwrap_or(usize::MAX);
        let taken = self
            .channels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(ChannelSlot(self.clone())),
            Err(_) => Err(format!(
                "over quota: interface \"{}\" takes at most {max} channels at once; try again when one has closed",
                self.interface
            )),
        }
    }

    /// Count one message, or say why it is over the rate.
    pub(crate) fn pass(&self) -> Result<(), String> {
        let Some(rate) = self.quota.messages_per_second else {
            return Ok(());
        };
        let rate = f64::from(rate.max(1));
        let mut bucket = lock(&self.bucket);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(bucket.1);
        bucket.0 = (bucket.0 + elapsed.as_secs_f64() * rate).min(rate);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            Ok(())
        } else {
            Err(format!(
                "over quota: interface \"{}\" takes at most {} messages per second; slow down",
                self.interface, rate as u64
            ))
        }
    }

    /// The window the message rate is measured over.
    #[cfg(test)]
    fn window() -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
}

/// A channel counted against its interface's cap until dropped.
#[derive(Debug)]
pub(crate) struct ChannelSlot(Arc<Gate>);

impl ChannelSlot {
    pub(crate) fn gate(&self) -> &Arc<Gate> {
        &self.0
    }
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.channels.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_cap_counts_live_slots() {
        let gate = Gate::new(
            "web",
            Quota {
                max_channels: Some(2),
                messages_per_second: None,
            },
        );
        let a = gate.take_channel().unwrap();
        let _b = gate.take_channel().unwrap();
        let err = gate.take_channel().unwrap_err();
        assert!(err.contains("at most 2 channels"), "{err}");
        drop(a);
        assert!(gate.take_channel().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_message_rate_refills_over_time() {
        let gate = Gate::new(
            "web",
            Quota {
                max_channels: None,
                messages_per_second: Some(10),
            },
        );
        for _ in 0..10 {
            gate.pass().unwrap();
        }
        let err = gate.pass().unwrap_err();
        assert!(err.contains("at most 10 messages per second"), "{err}");
        tokio::time::advance(Gate::window() / 2).await;
        for _ in 0..5 {
            gate.pass().unwrap();
        }
        assert!(gate.pass().is_err());
    }
}
