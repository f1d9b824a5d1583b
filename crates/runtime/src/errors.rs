//! The errors topic: records that could not be processed go there with
//! their context and original bytes, and the pipeline keeps flowing.

use dualwrite_model::avro;
use dualwrite_model::config::ErrorSettings;
use dualwrite_model::record::ErrorRecord;
use dualwrite_model::transform::redact_values;
use rdkafka::message::{Message, OwnedMessage};

use crate::kafka::{send_all, Outgoing, Producer};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot encode an error record: {0}")]
    Encode(#[from] avro::AvroError),
    #[error("cannot publish to the errors topic: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Writes error records to the errors topic.
#[derive(Clone)]
pub struct ErrorSink {
    producer: Producer,
    topic: String,
    service: &'static str,
    max_record_bytes: usize,
    settings: ErrorSettings,
}

impl ErrorSink {
    pub fn new(producer: Producer, topic: String, service: &'static str) -> ErrorSink {
        ErrorSink {
            producer,
            topic,
            service,
            max_record_bytes: 900_000,
            settings: ErrorSettings::default(),
        }
    }

    /// What records and logs may carry (`[errors]`): without
    /// `include_payload`, records keep neither the original bytes nor row
    /// values in their message.
    pub fn with_settings(mut self, settings: ErrorSettings) -> ErrorSink {
        self.settings = settings;
        self
    }

    /// Records larger than `n` bytes are not produced (see [`ErrorSink::oversized`]);
    /// original bytes kept in error records are cut to half of it.
    pub fn with_max_record_bytes(mut self, n: usize) -> ErrorSink {
        self.max_record_bytes = n;
        self
    }

    /// Whether a record is small enough to produce.
    pub fn fits(&self, r: &Outgoing) -> bool {
        r.key.len() + r.payload.len() <= self.max_record_bytes
    }

    /// The error record (`record_too_large`, with topic and key) for a
    /// record that does not [fit](ErrorSink::fits), which is not produced.
    pub fn too_large(&self, r: &Outgoing) -> ErrorRecord {
        let size = r.key.len() + r.payload.len();
        let mut e = self.record(
                "record_too_large",
                format!(
                    "a record of {size} bytes for {} (key {}) exceeds kafka.max_record_bytes ({}): not sent; \
                     to sync rows this large, raise it together with the broker's message.max.bytes and the topics' max.message.bytes",
                r.topic, r.key, self.max_record_bytes
            ),
        );
        e.key = Some(r.key.clone());
        e
    }

    /// An error record about a message read from Kafka, with its position and bytes.
    pub fn about(
        &self,
        m: &OwnedMessage,
        error_class: &str,
        message: impl Into<String>,
    ) -> ErrorRecord {
        let mut e = ErrorRecord::new(self.service, error_class, message, crate::now_micros());
        e.topic = Some(m.topic().to_owned());
        e.partition = Some(m.partition());
        e.offset = Some(m.offset());
        e.key = crate::kafka::key_text(m);
        e.payload = m.payload().map(<[u8]>::to_vec);
        e
    }

    /// The service this sink writes for.
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// A bare error record of this service.
    pub fn record(&self, error_class: &str, message: impl Into<String>) -> ErrorRecord {
        ErrorRecord::new(self.service, error_class, message, crate::now_micros())
    }

    /// Logs a record (at WARN with keys and names only, never row values)
    /// and returns it as it may be published (`include_payload = false`:
    /// without the original bytes nor values in its message).
    fn prepare<'a>(&self, r: &'a ErrorRecord) -> std::borrow::Cow<'a, ErrorRecord> {
        tracing::warn!(
            service = self.service,
            class = %r.error_class,
            map = r.map.as_deref().unwrap_or("-"),
            topic = r.topic.as_deref().unwrap_or("-"),
            offset = r.offset.unwrap_or(-1),
            key = r.key.as_deref().unwrap_or("-"),
            "{}",
            redact_values(&r.message)
        );
        if self.settings.log_values {
            tracing::debug!(class = %r.error_class, "with values: {}", r.message);
        }
        if self.settings.include_payload {
            return std::borrow::Cow::Borrowed(r);
        }
        let mut c = r.clone();
        c.payload = None;
        c.message = redact_values(&c.message);
        std::borrow::Cow::Owned(c)
    }

    /// Publishes the records and waits for the broker's acknowledgement.
    pub async fn publish(&self, records: &[ErrorRecord]) -> Result<(), SinkError> {
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let prepared = self.prepare(r);
            let r: &ErrorRecord = &prepared;
            crate::metrics::metrics()
                .errors
                .with_label_values(&[self.service, &r.error_class])
                .inc();
            let cut;
            let r = match &r.payload {
                Some(p) if p.len() > self.max_record_bytes / 2 => {
                    let mut c = r.clone();
                    c.payload = Some(p[..self.max_record_bytes / 2].to_vec());
                    c.message = format!(
                        "{} (original bytes cut to the first {} of {})",
                        r.message,
                        self.max_record_bytes / 2,
                        p.len()
                    );
                    cut = c;
                    &cut
                }
                _ => r,
            };
            let payload = avro::encode(r)?;
            out.push(Outgoing {
                topic: self.topic.clone(),
                key: r.key.clone().unwrap_or_default(),
                payload,
            });
        }
        Ok(send_all(&self.producer, &out).await?)
    }
}
