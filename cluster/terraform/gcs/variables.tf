variable "project_id" {
  description = "Google Cloud project of the bucket and the service account."
  type        = string
}

variable "location" {
  description = "Location of the bucket (a region such as europe-west1, or a multi-region)."
  type        = string
}

variable "bucket_name" {
  description = "Name of the GCS bucket that holds the storage root (globally unique)."
  type        = string
}

variable "prefix" {
  description = "Folder inside the bucket; the storage root is gs://<bucket>/<prefix>/<environment>."
  type        = string
  default     = "aiplatform"
}

variable "service_accounts" {
  description = "Kubernetes ServiceAccounts (namespace/name) that act as the Google service account through GKE Workload Identity."
  type        = list(string)
  default     = ["aiplatform/aiplatform", "aiplatform-dev/aiplatform"]
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept before it is deleted."
  type        = number
  default     = 30
}

variable "labels" {
  description = "Labels for the bucket."
  type        = map(string)
  default     = { "part-of" = "aiplatform" }
}
