//! Retrying the Kafka calls that fail for a while on a healthy cluster: a
//! topic just created whose partitions have no leader yet, leaders moving
//! or a broker restarting, a group coordinator still loading its offsets.
//! Such errors are waited out with a deadline instead of failing a service
//! start or an operator command.

use std::future::Future;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// How long transient errors are retried.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How long a topic the cluster does not know is waited for: right after
/// its creation the metadata may not show it everywhere yet; after that, it
/// does not exist.
pub const NEW_TOPIC_DEADLINE: Duration = Duration::from_secs(10);

/// Whether (and how long) a failed call may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A real failure: report it.
    No,
    /// Leaders, coordinators or connections that come back by themselves.
    Transient,
    /// A topic or partition the cluster does not know (yet).
    UnknownTopic,
}

impl Retry {
    fn deadline(self) -> Option<Duration> {
        match self {
            Retry::No => None,
            Retry::Transient => Some(DEADLINE),
            Retry::UnknownTopic => Some(NEW_TOPIC_DEADLINE),
        }
    }
}

/// The error code of any Kafka error, including admin operations.
pub fn code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(c) => Some(*c),
        e => e.rdkafka_error_code(),
    }
}

/// Classifies an error.
pub fn classify(e: &KafkaError) -> Retry {
    use RDKafkaErrorCode::*;
    match code(e) {
        Some(
            NotLeaderForPartition
            | LeaderNotAvailable
            | ReplicaNotAvailable
            | FencedLeaderEpoch
            | UnknownLeaderEpoch
            | OffsetNotAvailable
            | NotCoordinator
            | CoordinatorLoadInProgress
            | CoordinatorNotAvailable
            | WaitingForCoordinator
            | RebalanceInProgress
            | UnstableOffsetCommit
            | NotController
            | RequestTimedOut
            | OperationTimedOut
            | TimedOutQueue
            | BrokerNotAvailable
            | NetworkException
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | KafkaStorageError
            | ThrottlingQuotaExceeded
            | AllBrokersDown
            | BrokerTransportFailure
            | Resolve
            | WaitCache
            | Retry
            | Outdated,
        ) => self::Retry::Transient,
        Some(UnknownTopicOrPartition | UnknownTopic | UnknownPartition) => {
            self::Retry::UnknownTopic
        }
        _ => self::Retry::No,
    }
}

/// Whether `e`, after `elapsed` of retrying, may be tried again.
pub fn may_retry(e: &KafkaError, elapsed: Duration) -> bool {
    classify(e).deadline().is_some_and(|d| elapsed < d)
}

/// Pauses between tries: 50 ms, doubling up to 1 s.
struct Pauses(Duration);

impl Pauses {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(1));
        d
    }
}

/// Calls `f` until it succeeds, fails for good, or retriable errors last
/// past their deadline (blocking: call from a blocking task).
pub fn blocking<T>(
    what: &str,
    mut f: impl FnMut() -> Result<T, KafkaError>,
) -> Result<T, KafkaError> {
    let started = Instant::now();
    let mut pauses = Pauses(Duration::from_millis(50));
    loop {
        match f() {
            Err(e) if may_retry(&e, started.elapsed()) => {
                tracing::debug!("{what}: {e}; retrying");
                std::thread::sleep(pauses.next());
            }
            other => return other,
        }
    }
}

/// [`blocking`] for async calls.
pub async fn retrying<T, F, Fut>(what: &str, mut f: F) -> Result<T, KafkaError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KafkaError>>,
{
    let started = Instant::now();
    let mut pauses = Pauses(Duration::from_millis(50));
    loop {
        match f().await {
            Err(e) if may_retry(&e, started.elapsed()) => {
                tracing::debug!("{what}: {e}; retrying");
                tokio::time::sleep(pauses.next()).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_and_coordinator_errors_are_transient_and_bad_input_is_not() {
        let md = KafkaError::MetadataFetch;
        assert_eq!(
            classify(&md(RDKafkaErrorCode::NotLeaderForPartition)),
            Retry::Transient
        );
        assert_eq!(
            classify(&KafkaError::OffsetFetch(RDKafkaErrorCode::NotCoordinator)),
            Retry::Transient
        );
        assert_eq!(
            classify(&KafkaError::AdminOp(RDKafkaErrorCode::LeaderNotAvailable)),
            Retry::Transient
        );
        assert_eq!(
            classify(&md(RDKafkaErrorCode::UnknownTopicOrPartition)),
            Retry::UnknownTopic
        );
        assert_eq!(
            classify(&KafkaError::AdminOp(
                RDKafkaErrorCode::InvalidReplicationFactor
            )),
            Retry::No
        );
        assert_eq!(classify(&KafkaError::Canceled), Retry::No);
        assert!(!may_retry(
            &md(RDKafkaErrorCode::UnknownTopicOrPartition),
            NEW_TOPIC_DEADLINE
        ));
        assert!(may_retry(
            &md(RDKafkaErrorCode::LeaderNotAvailable),
            NEW_TOPIC_DEADLINE
        ));
    }

    #[test]
    fn blocking_retries_until_success_and_stops_on_a_real_failure() {
        let mut calls = 0;
        let r = blocking("t", || {
            calls += 1;
            if calls < 3 {
                Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::LeaderNotAvailable,
                ))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);
        let mut calls = 0;
        let r: Result<(), _> = blocking("t", || {
            calls += 1;
            Err(KafkaError::MetadataFetch(
                RDKafkaErrorCode::TopicAuthorizationFailed,
            ))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
