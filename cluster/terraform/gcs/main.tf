# The storage root of aiplatform on Google Cloud Storage: a private, versioned bucket and a
# service account with object access to it, which the pods' Kubernetes ServiceAccount acts as
# through GKE Workload Identity (annotate it with iam.gke.io/gcp-service-account).

resource "google_storage_bucket" "root" {
  name                        = var.bucket_name
  location                    = var.location
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  labels                      = var.labels

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
    }
    action {
      type = "Delete"
    }
  }
}

resource "google_service_account" "pods" {
  account_id   = "aiplatform-pods"
  display_name = "aiplatform Ray pods"
}

# Objects under the prefix only: an IAM condition on the object name. Listing is checked on the
# bucket itself, hence the second clause; bucket metadata (storage.buckets.get, which clients
# call first) comes from legacyBucketReader below.
resource "google_storage_bucket_iam_member" "objects" {
  bucket = google_storage_bucket.root.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.pods.email}"
  condition {
    title      = "aiplatform-prefix"
    expression = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.root.name}/objects/${var.prefix}/\") || resource.type == \"storage.googleapis.com/Bucket\""
  }
}

resource "google_storage_bucket_iam_member" "list" {
  bucket = google_storage_bucket.root.name
  role   = "roles/storage.legacyBucketReader"
  member = "serviceAccount:${google_service_account.pods.email}"
}

# Workload Identity: each Kubernetes ServiceAccount may act as the Google service account.
resource "google_service_account_iam_member" "workload_identity" {
  for_each           = toset(var.service_accounts)
  service_account_id = google_service_account.pods.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${each.value}]"
}
